"""Airflow DAG running a dmice job every night: validate, impute, verify.

Each task is a plain ``dmice`` command; dmice's exit codes tell Airflow what happened:
0 done (or nothing to do), 1 unexpected (storage or cluster trouble: worth a retry), 2 invalid
job or input, 3 output conflict, 4 verification failure (2-4 need a person, not a retry).

The run id is the logical date, so a retry of the same night reuses (and replaces) its own
uncommitted files, and a re-run of a finished night is a no-op.  Credentials come from the
workers' environment or role, never from the job file.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.operators.bash import BashOperator

JOB = "/opt/jobs/cohort_imputation.yaml"
OUTPUT = "s3://lake/imputed/cohort/as_of={{ ds }}/"
ENV = {
    # what differs between environments; see the README's "Scheduled jobs" section
    "DMICE_INPUT_URL": "s3://lake/cohort/as_of={{ ds }}/",
    "DMICE_OUTPUT_URL": OUTPUT,
    "DMICE_CLUSTER_ADDRESS": "tcp://dask-scheduler.data.svc:8786",
}

with DAG(
    dag_id="cohort_imputation",
    schedule="0 2 * * *",
    start_date=dt.datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,  # one run per output at a time
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
) as dag:
    validate = BashOperator(
        task_id="validate",
        bash_command=f"dmice validate {JOB}",
        env=ENV,
        append_env=True,
        retries=0,
    )
    run = BashOperator(
        task_id="impute",
        bash_command=f"dmice run {JOB} --run-id {{{{ ts_nodash }}}}",
        env=ENV,
        append_env=True,
        execution_timeout=dt.timedelta(hours=6),
    )
    verify = BashOperator(
        task_id="verify",
        bash_command=f"dmice verify {OUTPUT}",
        env=ENV,
        append_env=True,
    )
    validate >> run >> verify
