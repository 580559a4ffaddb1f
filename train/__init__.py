"""InfoNCE embedding training on Ray Train, hard-negative mining and MTEB evaluation."""
