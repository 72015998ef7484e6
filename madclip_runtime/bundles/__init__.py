"""The bundle format: the one reader/writer, metadata validation, integrity record, signatures, self-test."""
