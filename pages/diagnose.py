"""Diagnose: one uploaded smear image through a trained model."""
import plotly.express as px
import streamlit as st

from bcd_engine import dashboard, settings
from bcd_engine.errors import BCDError
from ui import common

st.title("Diagnose an image")
st.warning("**Research and teaching use only — not a medical device.** Never use it to diagnose anyone.",
           icon=":material/warning:")
common.explain(
    "Upload a peripheral blood smear image and a trained model tells you which class it looks most like, "
    "with a probability per class. The probabilities are the model's own confidence, not a calibrated "
    "chance of disease; a model trained on the SYNTHETIC demo set knows nothing about real smears."
)
common.demo_banner()
store = common.store()

best = dashboard.best_completed_run(store)
if best is None:
    common.no_runs_yet("diagnose")
runs = [r for r in store.list_runs(status="completed")]
labels = {r.id: f"run {r.id}: {r.backbone}, test accuracy {r.test_accuracy:.3f}" + (" (best)" if r.id == best.id else "")
          for r in runs}
run_id = st.selectbox("Model", list(labels), index=list(labels).index(best.id), format_func=labels.get,
                      key="diagnose_run")
upload = st.file_uploader("Smear image", type=["jpg", "jpeg", "png", "bmp", "tif", "tiff"], key="diagnose_upload",
                          help=f"At most {dashboard.MAX_UPLOAD_BYTES // 2**20} MB.")
if upload is None:
    st.stop()

try:
    loaded = common.load_model(run_id, settings.database_url(), str(settings.artifacts_dir()))
    image, probabilities = dashboard.predict_bytes(loaded, upload.getvalue())
except BCDError as exc:
    st.error(f"Cannot use this: {exc}")
    st.stop()

predicted = max(probabilities, key=probabilities.get)
left, right = st.columns(2)
left.image(image, caption=upload.name, width="stretch")
right.metric("Predicted class", predicted, f"{probabilities[predicted]:.1%} confidence", delta_color="off")
fig = px.bar(x=list(probabilities.values()), y=list(probabilities), orientation="h", range_x=[0, 1],
             labels={"x": "probability", "y": "class"}, text=[f"{p:.1%}" for p in probabilities.values()])
right.plotly_chart(fig, key="diagnose_probabilities")
