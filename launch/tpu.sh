#!/bin/bash
# Training on a Cloud TPU VM slice: every worker (host) of the slice runs one JAX process, and
# the data dir and the workdir live in a gs:// bucket that all of them read and write.
#
#   BUCKET=gs://my-bucket CONFIG=configs/source_only.py:gta5 RUN=so_gta5 bash launch/tpu.sh create
#   ... bash launch/tpu.sh install      # once per slice
#   ... bash launch/tpu.sh train        # again after a preemption: it resumes
#   ... bash launch/tpu.sh logs | stop | delete
#
# Each step is an ordinary gcloud command line, printed before it runs; read them, or copy them
# into your own scripts. Needs the gcloud CLI, logged in, with a project that has TPU quota in
# ZONE, and a bucket in the same region.
set -euo pipefail

ACTION="${1:?usage: launch/tpu.sh create|install|train|logs|stop|delete}"
TPU_NAME="${TPU_NAME:-synseg-jax}"
ZONE="${ZONE:-us-central2-b}"
# A v4-32 is 4 hosts with 4 chips each. The software version must suit the generation
# (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
ACCELERATOR="${ACCELERATOR:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url || true)}"
BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-configs/source_only.py:demo}"
RUN="${RUN:-run}"
DATA_DIR="${DATA_DIR:-${BUCKET}/tensorflow_datasets}"
WORKDIR="${WORKDIR:-${BUCKET}/runs/${RUN}}"

run() { echo "+ $*"; "$@"; }
on_all_workers() {
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

case "${ACTION}" in
create)
    # --spot: a fraction of the price, preempted at any time; training resumes from the bucket.
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
        --accelerator-type="${ACCELERATOR}" --version="${VERSION}" ${SPOT:+--spot}
    ;;
install)
    : "${REPO_URL:?set REPO_URL to a git URL the workers can clone}"
    # The images ship Python 3.10; the project needs 3.11 or newer.
    on_all_workers "set -e
        sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv git
        python3.11 -m venv ~/venv
        [ -d ~/synseg_jax ] || git clone ${REPO_URL} ~/synseg_jax
        cd ~/synseg_jax && git pull --ff-only
        ~/venv/bin/pip install -q -e '.[tpu]'"
    ;;
train)
    : "${BUCKET:?set BUCKET=gs://your-bucket (data dir and workdir live there)}"
    # The same command on every worker, at once: JAX finds the other hosts of the slice
    # (--distributed=auto); each host reads its own share of every batch from the bucket
    # through tf.io.gfile, and all of them write one checkpoint into WORKDIR. nohup keeps
    # training when the ssh session ends. minicity is rendered into the bucket on first use
    # (worker 0 renders, the others wait); a real dataset must have been prepared into a local
    # folder with `python -m synseg_jax.prepare` and copied there (gcloud storage cp -r).
    on_all_workers "cd ~/synseg_jax && nohup ~/venv/bin/python -m synseg_jax.main \
        --config='${CONFIG}' --config.data.data_dir='${DATA_DIR}' --workdir='${WORKDIR}' \
        --distributed=auto > ~/train_${RUN}.log 2>&1 < /dev/null & echo \$! > ~/train_${RUN}.pid"
    echo "training ${RUN}; progress: launch/tpu.sh logs, or tensorboard --logdir=${WORKDIR}"
    ;;
logs)
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=0 \
        --command="tail -n 30 ~/train_${RUN}.log"
    ;;
stop)
    # SIGTERM: every process finishes its step, one checkpoint is written, and they exit
    # (code 75). `train` later resumes from it. A preemption sends the same signal.
    on_all_workers "kill -TERM \$(cat ~/train_${RUN}.pid) || true"
    ;;
delete)
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
    ;;
*)
    echo "unknown action ${ACTION}; expected create|install|train|logs|stop|delete" >&2
    exit 2
    ;;
esac
