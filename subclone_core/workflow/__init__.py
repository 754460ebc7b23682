"""End-to-end steps shared by the command line and the app: importance, children, training jobs."""
