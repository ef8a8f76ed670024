"""Pipeline stages: one file per stage, pure logic over records plus a thin Ray adapter."""
