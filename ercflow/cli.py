def main(argv=None):
    raise SystemExit("ercflow: no commands yet")
