"""AirRep: a trained text encoder whose (attention-pooled) dot products predict subset effects."""
