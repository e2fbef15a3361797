"""Attention and loss kernels: one entry point each, with backends tested against the XLA reference."""
