"""Batch jobs: detector, gallery build, text tagging, Ray orchestration."""
