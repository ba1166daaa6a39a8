"""bcd dashboard: `streamlit run app.py`. Sets the page config and routes to the pages."""

import streamlit as st

st.set_page_config(page_title="bcd: blood cancer detection", page_icon=":material/biotech:", layout="wide")

page = st.navigation(
    [
        st.Page("pages/explorer.py", title="Dataset explorer", icon=":material/photo_library:", default=True),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/compare.py", title="Compare runs", icon=":material/compare:"),
        st.Page("pages/diagnose.py", title="Diagnose", icon=":material/stethoscope:"),
    ]
)
# Before the page runs: a page that stops early (st.stop) must still show the note.
st.sidebar.caption("Research and teaching use only — **not a medical device**.")
page.run()
