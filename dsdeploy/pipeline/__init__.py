"""Recipes, the stages of `dsdeploy run`, the staged engine with caching, the report."""
