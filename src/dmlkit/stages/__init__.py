"""Pipeline stages: each reads its config slice and upstream artifacts and writes one artifact."""
