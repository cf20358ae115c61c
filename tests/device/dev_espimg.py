# MicroPython: check ESP-IDF app images with mpboot.espimg, streamed from files.
# Usage: dev_espimg LISTING, a file of "path partition_size" lines; one line out per image:
# "OK chip_id entry segments length sha256hex version project idf_ver" (tab-separated) or
# "REJECT code".
import sys

from mpboot import espimg, reader

buf = bytearray(espimg.BUF_SIZE)
with open(sys.argv[1]) as listing:
    for line in listing:
        path, part_size = line.split()
        with open(path, "rb") as f:
            try:
                i = espimg.check(reader.file_reader(f), int(part_size), buf)
            except espimg.EspImageError as e:
                print("REJECT", e.args[0])
                continue
        sha = "".join("%02x" % b for b in i["sha256"])
        print("OK", i["chip_id"], i["entry"], i["segments"], i["length"], sha, i["version"].decode(),
              i["project"].decode(), i["idf_ver"].decode(), sep="\t")
