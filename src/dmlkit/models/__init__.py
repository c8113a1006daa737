"""Backbone with GeM and neck, margin heads, SEE."""
