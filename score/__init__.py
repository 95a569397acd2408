"""Stage 'score' of the gru4rec pipeline (installed as gru4rec.score)."""
