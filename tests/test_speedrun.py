from pocketgpt.speedrun import probes_line


def test_probes_line_reads_as_a_sentence():
    line = probes_line({"entropy": 5.6145, "distinct_names": 0.789, "names_per_answer": 1.8125},
                       {"expression": 1.0, "result": 0.5, "list": 0.0})
    assert line == ("diversity: entropy 5.61 nats, 79% distinct names, 1.8 names an answer; "
                    "in-context copying: expression 100%, result 50%, list 0%")
