"""Use cases that combine the model and the stores: indexing, bulk embedding, audit, ensembles."""
