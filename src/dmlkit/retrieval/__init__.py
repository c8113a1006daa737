"""kNN search, query expansion, re-ranking and label voting, as functions over arrays."""
