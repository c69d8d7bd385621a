// The EU Commission's DSS validator, offline, under its default policy: an outside judge of our stamps.
//   java -cp '.local/dss/libs/*' deploy/local/dss/DssValidate.java FILE.pdf TRUST_ANCHOR.pem [VALIDATION_TIME]
// Prints one line per signature and per time-stamp:
//   SIGNATURE <id> <indication> <subindication or -> <format>   (then "  ERROR <message>" / "  WARNING <message>")
//   TIMESTAMP <id> <indication> <subindication or -> <type>
//   MODIFICATION <signature id> undefined|annotation <action> <object>   (changes DSS found after a signature)
import eu.europa.esig.dss.diagnostic.DiagnosticData;
import eu.europa.esig.dss.diagnostic.PDFRevisionWrapper;
import eu.europa.esig.dss.diagnostic.jaxb.XmlObjectModification;
import eu.europa.esig.dss.diagnostic.SignatureWrapper;
import eu.europa.esig.dss.enumerations.SubIndication;
import eu.europa.esig.dss.model.FileDocument;
import eu.europa.esig.dss.simplereport.SimpleReport;
import eu.europa.esig.dss.spi.DSSUtils;
import eu.europa.esig.dss.spi.validation.CommonCertificateVerifier;
import eu.europa.esig.dss.spi.x509.CommonTrustedCertificateSource;
import eu.europa.esig.dss.validation.SignedDocumentValidator;
import eu.europa.esig.dss.validation.reports.Reports;

import java.io.File;
import java.time.Instant;
import java.util.Date;

public class DssValidate {
    public static void main(String[] args) throws Exception {
        CommonTrustedCertificateSource trusted = new CommonTrustedCertificateSource();
        trusted.addCertificate(DSSUtils.loadCertificate(new File(args[1])));
        CommonCertificateVerifier verifier = new CommonCertificateVerifier();
        verifier.setTrustedCertSources(trusted);
        // offline: only what the document carries
        verifier.setAIASource(null);
        verifier.setOcspSource(null);
        verifier.setCrlSource(null);
        SignedDocumentValidator validator = SignedDocumentValidator.fromDocument(new FileDocument(args[0]));
        validator.setCertificateVerifier(verifier);
        if (args.length > 2) {
            validator.setValidationTime(Date.from(Instant.parse(args[2])));
        }
        Reports reports = validator.validateDocument();
        SimpleReport simple = reports.getSimpleReport();
        for (String id : simple.getSignatureIdList()) {
            SubIndication sub = simple.getSubIndication(id);
            System.out.println("SIGNATURE " + id + " " + simple.getIndication(id) + " " + (sub == null ? "-" : sub)
                    + " " + simple.getSignatureFormat(id));
            simple.getAdESValidationErrors(id).forEach(m -> System.out.println("  ERROR " + m.getValue()));
            simple.getAdESValidationWarnings(id).forEach(m -> System.out.println("  WARNING " + m.getValue()));
        }
        for (String id : simple.getTimestampIdList()) {
            SubIndication sub = simple.getSubIndication(id);
            System.out.println("TIMESTAMP " + id + " " + simple.getIndication(id) + " " + (sub == null ? "-" : sub));
            simple.getAdESValidationErrors(id).forEach(m -> System.out.println("  ERROR " + m.getValue()));
        }
        DiagnosticData diagnostic = reports.getDiagnosticData();
        for (SignatureWrapper sig : diagnostic.getSignatures()) {
            PDFRevisionWrapper revision = sig.getPDFRevision();
            if (revision == null) continue;
            for (XmlObjectModification m : revision.getPdfUndefinedChanges()) {
                System.out.println("MODIFICATION " + sig.getId() + " undefined " + m.getAction() + " " + m.getValue());
            }
            for (XmlObjectModification m : revision.getPdfAnnotationChanges()) {
                System.out.println("MODIFICATION " + sig.getId() + " annotation " + m.getAction() + " " + m.getValue());
            }
        }
    }
}
