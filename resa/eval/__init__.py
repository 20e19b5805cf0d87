"""Quality evaluation of ReSA against dense decoding on real models and real text."""
