"""``make demo`` (``python -m services.demo``): ``scenarios`` one order per path of the
saga, ``load`` a conference's ticket sales through every path at once, ``report`` what
they show and check."""
