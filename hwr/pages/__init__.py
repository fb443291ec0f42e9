"""From scanned pages to labelled line images: importing ALTO/PAGE XML ground truth,
cutting pages into lines without any, and the labelling page."""
