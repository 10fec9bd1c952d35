"""Datasets and the one preprocessing rule: image folders and digits, preprocessing resolution, class labels."""
