"""Evaluation: sample-quality metrics and the feature networks they use; MMBench's CircularEval
(``circular``)."""
