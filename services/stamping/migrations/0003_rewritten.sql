-- The hash of the rewrite a stamp was appended to, when the input had to be rewritten first (an
-- unsigned file pyHanko could not read or whose cross-reference table was damaged: document/repair.py).
-- NULL: the stamp was appended to the document as received (document_sha256).
ALTER TABLE requests ADD COLUMN rewritten_sha256 text;
