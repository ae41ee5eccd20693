"""Data helpers: image loading and the prompt templates of the training set."""
