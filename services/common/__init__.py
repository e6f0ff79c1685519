"""Pieces every tokenmill service shares: config, logging, gRPC bootstrap, metrics, model loading."""
