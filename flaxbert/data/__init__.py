"""Corpora, pre-training instances (NSP pairs + MLM masks) and the batch loader."""
