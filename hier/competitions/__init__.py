"""Competition formats: each one's submission writer and scoring rules (``hecto``)."""
