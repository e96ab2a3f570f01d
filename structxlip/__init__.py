"""StructXLIP training and evaluation library (no Prefect imports)."""
