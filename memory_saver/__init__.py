"""GPU memory that can be released and resumed at the same virtual addresses."""
