"""The local metrics, each on its own read of the store: k-NN overlap on FAISS (:mod:`.knn`) and cross-model
linear probes on pooled document features (:mod:`.probe`)."""
