"""The Streamlit app's non-page code: settings, background jobs, charts, analyses and session state.

Only ``ui`` imports Streamlit; everything else is testable without it.
"""
