"""guidedrl: reinforcement-learning fine-tuning of language models with first-class guidance."""

__version__ = "0.1.0"
