"""Helpers the tests share: tiny real models, image folders, results directories."""
