#!/usr/bin/env bash
# Renders an SVG written by mpar_timeline_write_svg in headless Chromium and
# checks the picture is not blank: enough distinct colours, enough non-white
# pixels, and more of the forward colour (#4e79a7) than the legend swatch
# alone has, so the stage lanes were drawn.
#   scripts/check-svg.sh timeline.svg [out.png] [min_colours]
# Exit 0: renders sensibly; 1: it does not; 2: usage, or no Chromium /
# python3 (Debian: apt-get install chromium).
set -u
svg=${1:-}
[ -n "$svg" ] && [ -f "$svg" ] || { echo "usage: $0 file.svg [out.png] [min_colours]" >&2; exit 2; }
png=${2:-${svg%.svg}.png}
min_colours=${3:-8}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "check-svg: chromium not found (apt-get install chromium)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "check-svg: python3 not found" >&2; exit 2; }

# The page size is the SVG's own size (its root width/height attributes).
size=$(python3 - "$svg" <<'EOF'
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
print("%d,%d" % (int(float(r.get("width", "1200"))), int(float(r.get("height", "400")))))
EOF
) || { echo "check-svg: $svg is not well-formed XML" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$png"
# --no-sandbox: Chromium refuses to run as root otherwise (containers, CI).
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$profile" --window-size="$size" --screenshot="$png" \
    "file://$(cd "$(dirname "$svg")" && pwd)/$(basename "$svg")" >"$profile/log" 2>&1
if [ ! -s "$png" ]; then
  echo "check-svg: Chromium wrote no screenshot:" >&2
  cat "$profile/log" >&2
  exit 1
fi

# PNG decoding with the standard library only (8-bit RGB/RGBA, no interlace).
python3 - "$png" "$min_colours" <<'EOF'
import struct, sys, zlib
path, min_colours = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, w = 8, b"", 0
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        assert depth == 8 and ctype in (2, 6) and interlace == 0, "unsupported PNG %d/%d/%d" % (depth, ctype, interlace)
        bpp = 3 if ctype == 2 else 4
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
raw, stride = zlib.decompress(idat), w * bpp
prev, rows, i = bytearray(stride), [], 0
for y in range(h):
    f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
    i += 1 + stride
    for x in range(stride):
        a = line[x - bpp] if x >= bpp else 0
        b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + ((a + b) >> 1)) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    rows.append(bytes(line))
    prev = line
colours, ink, forward = set(), 0, 0
for line in rows:
    for x in range(0, stride, bpp):
        px = line[x:x + 3]
        colours.add(px)
        ink += px != b"\xff\xff\xff"
        forward += px == b"\x4e\x79\xa7"
share = ink / float(w * h)
print("check-svg: %s %dx%d, %d colours, %.1f%% non-white, %d forward-colour pixels" % (path, w, h, len(colours), 100 * share, forward))
ok = len(colours) >= min_colours and share >= 0.02 and forward > 2 * 14 * 12
if not ok:
    print("check-svg: FAILED (need >= %d colours, >= 2%% non-white, > %d forward pixels)" % (min_colours, 2 * 14 * 12))
sys.exit(0 if ok else 1)
EOF
