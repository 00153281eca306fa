/work/main/board/target/release/deps/board-692abe01ade2bcc6.d: src/lib.rs src/accelerometer.rs src/sht3x.rs src/sim.rs src/trigger.rs

/work/main/board/target/release/deps/libboard-692abe01ade2bcc6.rlib: src/lib.rs src/accelerometer.rs src/sht3x.rs src/sim.rs src/trigger.rs

/work/main/board/target/release/deps/libboard-692abe01ade2bcc6.rmeta: src/lib.rs src/accelerometer.rs src/sht3x.rs src/sim.rs src/trigger.rs

src/lib.rs:
src/accelerometer.rs:
src/sht3x.rs:
src/sim.rs:
src/trigger.rs:
