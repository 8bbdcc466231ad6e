"""Studies on real data that drive the library: see fashion_mnist.py."""
