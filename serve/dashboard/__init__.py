"""The Streamlit dashboard for quants: a client of the signal API and a reader of sweep run
directories and Silver (`streamlit run serve/dashboard/app.py`)."""
