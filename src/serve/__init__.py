"""The serving side: a trained model (a run folder or a bundle) on a clinician's own scans.

    python -m src.serve.demo --run BUNDLE /path/to/dicoms --results-dir demo_out   # files in, results as files
    python -m src.serve.webapp --run BUNDLE                                        # a local web page
    python -m src.serve.node --run BUNDLE --send-to PACS_HOST:4242:ORTHANC         # a DICOM node beside a PACS

`results` owns what the three front ends share: the scored series, its summary and verdict, and its pictures;
`dicom_out` writes the DICOM objects the node sends back. These modules have dependencies of their own (FastAPI,
pynetdicom, highdicom) that the training pipeline never imports, and run.sh runs none of them.
"""
