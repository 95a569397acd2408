"""Stage 'export' of the gru4rec pipeline (installed as gru4rec.export)."""
