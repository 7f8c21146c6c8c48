#!/usr/bin/env bash
# Builds every image the compose stack needs with no registry (nothing is
# pulled): a Debian base made with debootstrap and `docker import`, the
# Courier image (the host's release binary in the shipped Dockerfile's
# runtime stage, on that base), and stand-ins for the images that cannot
# be pulled, from Debian's packages: RabbitMQ (management and Prometheus
# plugins) and Prometheus. Idempotent and cached: with nothing changed, a
# second run takes seconds.
#
#   bash tests/compose/build-images.sh      # then: tests/compose/local.yml
#
# Needs root (debootstrap, chroot), debootstrap, a Docker engine, cargo,
# and Debian's mirror (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${COURIER_IMAGE_CACHE:-/var/cache/courier-images}
TAG=courier-local
log() { printf '== %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

# The host's binary runs on the base: both must be the same Debian release.
. /etc/os-release
[ "${VERSION_CODENAME:-}" = "$SUITE" ] \
  || { echo "build-images.sh builds on Debian $SUITE (the base's glibc); this host is ${PRETTY_NAME:-unknown}" >&2; exit 1; }
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
mkdir -p "$CACHE"
# One build at a time per cache (images and rootfs folders are shared).
exec 9>"$CACHE/.lock"
flock 9
# A chroot's /proc is unmounted however the script ends.
mounted=()
trap 'for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done' EXIT

# The base: a minimal Debian, the same release the release binary is built on.
base=$CACHE/rootfs-$SUITE
if [ ! -e "$base/.complete" ]; then
  log "debootstrap $SUITE into $base"
  rm -rf "$base"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$base" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*
  touch "$base/.complete"
fi
if ! have $TAG/debian:$SUITE; then
  log "importing $TAG/debian:$SUITE"
  tar --exclude=./.complete -C "$base" -c . | docker import - $TAG/debian:$SUITE >/dev/null
fi

# A stand-in: the base with Debian packages installed in a chroot (the host's
# network; no container network is needed), imported with its run settings.
# The image is labelled with a hash of its recipe and base, and rebuilt
# when either changed.
# derive NAME "PACKAGES" [docker import -c changes...]
derive() {
  local name=$1 packages=$2; shift 2
  local recipe
  recipe=$( { docker image inspect -f '{{.Id}}' $TAG/debian:$SUITE; echo "$packages ${DERIVE_SETUP:-} $*"; } | sha256sum | cut -c1-16)
  [ "$(docker image inspect -f '{{index .Config.Labels "courier.recipe"}}' $TAG/$name:latest 2>/dev/null)" = "$recipe" ] && return 0
  local root=$CACHE/rootfs-$name
  log "building $TAG/$name from Debian's $packages"
  umount -l "$root/proc" 2>/dev/null || true
  rm -rf --one-file-system "$root"
  cp -a "$base" "$root"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"   # no service starts in the chroot
  chmod +x "$root/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mounted+=("$root/proc")
  chroot "$root" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages && apt-get clean && rm -rf /var/lib/apt/lists/*" \
    >"$CACHE/$name.log" 2>&1 || { tail -20 "$CACHE/$name.log" >&2; exit 1; }
  umount "$root/proc"
  rm -f "$root/usr/sbin/policy-rc.d" "$root/.complete" "$root/etc/resolv.conf"
  [ -n "${DERIVE_SETUP:-}" ] && chroot "$root" sh -c "$DERIVE_SETUP"
  local changes=(-c "LABEL courier.recipe=$recipe")
  for c in "$@"; do changes+=(-c "$c"); done
  tar -C "$root" -c . | docker import "${changes[@]}" - $TAG/$name:latest >/dev/null
  rm -rf "$root"
}

# RabbitMQ 3.10 from Debian, run as its own user, logging to stdout.
DERIVE_SETUP='mkdir -p /var/lib/rabbitmq /etc/rabbitmq/conf.d && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq' \
derive rabbitmq "rabbitmq-server" \
  'ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  'USER rabbitmq' 'WORKDIR /var/lib/rabbitmq' 'EXPOSE 5672 15672 15692' \
  'CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]'

# Prometheus from Debian, with the official image's paths.
DERIVE_SETUP='mkdir -p /prometheus && chown prometheus /prometheus' \
derive prometheus "prometheus" \
  'USER prometheus' 'WORKDIR /prometheus' 'EXPOSE 9090' \
  'ENTRYPOINT ["/usr/bin/prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090"]'

# Courier: the release binary built here, in the shipped Dockerfile's
# runtime stage (taken from it, so the two cannot drift), on the local base.
log "building the release binary"
cargo build --release --locked -p courier >&2
ctx=$CACHE/courier-context
rm -rf "$ctx" && mkdir -p "$ctx/bin"
strip -o "$ctx/bin/courier" target/release/courier   # debug info stays on the host
cp -r config "$ctx/config"
sed -n '/^FROM debian:bookworm-slim/,$p' Dockerfile \
  | sed -e "s|^FROM debian:bookworm-slim.*|FROM $TAG/debian:$SUITE|" \
        -e "s|^COPY --from=build /usr/local/bin/courier |COPY bin/courier |" \
  >"$ctx/Dockerfile"
grep -q "^FROM $TAG/debian:$SUITE" "$ctx/Dockerfile" && grep -q '^COPY bin/courier ' "$ctx/Dockerfile" \
  || { echo "the Dockerfile's runtime stage changed shape: update $0" >&2; exit 1; }
log "building $TAG/courier:latest"
docker build -q -t $TAG/courier:latest "$ctx" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "^$TAG/" >&2
