#!/bin/sh
# Serves the model folder in $TOKENFLOW_BACKEND_MODEL. Where the folder holds no model yet (no
# weights can be downloaded on this node), one with random weights and a real tokenizer is written
# first, so the compute is real — set TOKENFLOW_INIT_SIZE=tiny|small (default small).
set -eu
model="${TOKENFLOW_BACKEND_MODEL:?set TOKENFLOW_BACKEND_MODEL to a model folder}"
if [ ! -f "$model/config.json" ]; then
  echo "backend-entrypoint: no model in $model; writing a ${TOKENFLOW_INIT_SIZE:-small} one with random weights"
  tokenflow-backend init-model --size "${TOKENFLOW_INIT_SIZE:-small}" --out "$model"
fi
exec tokenflow-backend serve "$@"
