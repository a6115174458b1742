"""Retrieval over a real vector index (faiss): kNN-LM's datastore and evaluation
(Khandelwal et al. 2020). faiss is imported only when an index is built or searched."""
