#!/bin/sh
# Container entrypoint of mx-relay (the image's ENTRYPOINT, CMD ["serve"]).
#
#   serve [ARGS]   migrate the queue database to head (`relay db upgrade`),
#                  then replace this shell with `relay serve ARGS`, so relay
#                  is PID 1 and receives SIGTERM from `docker stop` itself.
#                  `relay serve` would migrate an empty database too, but a
#                  failed migration here stops the container with its own
#                  message before anything listens.
#   anything else  run as `relay ARGS`, e.g. `docker run --rm -v
#                  relay-queue:/var/lib/relay mx-relay queue list`.
#
# The config comes from $RELAY_CONFIG (/etc/relay/relay.toml in the image);
# RELAY_LISTEN and RELAY_QUEUE_URL override smtp.listen and queue.url.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi

if [ "$1" = serve ]; then
    relay db upgrade
    exec relay "$@"
fi

exec relay "$@"
