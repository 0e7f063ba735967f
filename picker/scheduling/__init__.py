"""Scheduling: filters narrow the candidates, weighted scorers rank them, a picker chooses."""
