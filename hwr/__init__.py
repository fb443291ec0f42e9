"""hwr: teach a handwriting recognizer to read one person's handwriting."""
