"""Input data: readers and pipelines. Knows nothing of the models."""
