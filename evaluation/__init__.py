"""The evaluate stage: model, system and hardware metrics of a trained model, and the blessing gate.

* ``entry``         the stage (``run``), called by ``avp evaluate`` and the Airflow DAG
* ``frames``        the test split of a dataset as numpy records
* ``segmentation``  point metrics: confusion matrix, precision / recall / IoU, mIoU, PR curves
* ``objects``       predicted points grouped into objects and matched to ground-truth boxes
* ``planner``       system metrics: a longitudinal planner on perception vs on ground truth
* ``scoring``       one pass of a model over the frames, collecting all of the above per split and scene
* ``hardware``      latency, jitter, throughput, memory, MACs of eager / TorchScript / exported models
* ``blessing``      the verdict: absolute thresholds and no regression against production
* ``feedback``      hard scenes up-weighted for the next ingest (``<home>/feedback/sample_weights.json``)
* ``report``        the self-contained ``report.html`` (``metrics.json``: ``pipeline.contracts.EvaluationMetrics``)
"""
