"""decodekit's drafters inside other libraries' generation loops (:mod:`decodekit.integrations.transformers`)."""
