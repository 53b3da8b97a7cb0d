"""Use cases that combine the model and the stores: indexing and labelling listings, bulk embedding,
ensembles, and the copies of an artifact and its gallery a long-lived process holds."""
