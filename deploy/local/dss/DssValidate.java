// The EU Commission's DSS validator, offline, under its default policy: an outside judge of our stamps.
//   java -cp '.local/dss/libs/*' deploy/local/dss/DssValidate.java FILE.pdf TRUST_ANCHOR.pem [VALIDATION_TIME]
// Prints one line per signature and per time-stamp:
//   SIGNATURE <id> <indication> <subindication or -> <format>   (then "  ERROR <message>" / "  WARNING <message>")
//   TIMESTAMP <id> <indication> <subindication or -> <type>
//   MODIFICATION <signature id> undefined|annotation <action> <object>   (changes DSS found after a signature)
// Batch mode, several files in one JVM (its start-up is most of a single call's time):
//   ... DssValidate --batch TRUST_ANCHOR.pem VALIDATION_TIME|- FILE.pdf...
// prints "DOCUMENT <file>" before each file's lines.
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
        if (args.length > 0 && args[0].equals("--batch")) {
            String at = args[2].equals("-") ? null : args[2];
            for (int i = 3; i < args.length; i++) {
                System.out.println("DOCUMENT " + args[i]);
                validate(args[i], args[1], at);
            }
            return;
        }
        validate(args[0], args[1], args.length > 2 ? args[2] : null);
    }

    static void validate(String document, String anchor, String at) throws Exception {
        CommonTrustedCertificateSource trusted = new CommonTrustedCertificateSource();
        trusted.addCertificate(DSSUtils.loadCertificate(new File(anchor)));
        CommonCertificateVerifier verifier = new CommonCertificateVerifier();
        verifier.setTrustedCertSources(trusted);
        // offline: only what the document carries
        verifier.setAIASource(null);
        verifier.setOcspSource(null);
        verifier.setCrlSource(null);
        SignedDocumentValidator validator = SignedDocumentValidator.fromDocument(new FileDocument(document));
        validator.setCertificateVerifier(verifier);
        if (at != null) {
            validator.setValidationTime(Date.from(Instant.parse(at)));
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
