"""Training the parts that trained drafters need (``decodekit train``), on a frozen target."""
