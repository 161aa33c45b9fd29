// The C# bindings' test program, run with mono by tests/test_bindings.py (or by hand, see bindings/README.md):
//
//   mono BindingsTest.exe --vectors bindings/testvectors --python .venv/bin/python --model DIR --port 5611
//        --dead-port 5612 --prompt-tokens 1,2,3 --expect-tokens 59,90,158 --expect-logprobs -0.05,-0.28,-0.0004
//
// Offline checks first (msgpack against the test vectors, ZMTP framing), then a real `gllm serve` started
// with RuntimeProcess. Each step prints "ok NAME (ms)"; the first failure prints "FAIL NAME: why" and exits 1.
// The last line is "N passed, 0 failed" on success.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.Threading;
using System.Threading.Tasks;

namespace Gllm.Tests
{
    public static class Program
    {
        public static int Main(string[] argv)
        {
            Dictionary<string, string> args;
            try
            {
                args = ParseArgs(argv);
            }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine(e.Message);
                return 2;
            }
            var steps = new List<KeyValuePair<string, Action>>();
            CodecTests.AddSteps(steps, args["vectors"]);
            RuntimeTests runtime = null;
            if (args.ContainsKey("python"))
            {
                runtime = new RuntimeTests(args);
                runtime.AddSteps(steps);
            }
            int passed = 0;
            try
            {
                foreach (KeyValuePair<string, Action> step in steps)
                {
                    var clock = Stopwatch.StartNew();
                    try
                    {
                        step.Value();
                    }
                    catch (Exception e)
                    {
                        Console.WriteLine("FAIL {0}: {1}", step.Key, Unwrap(e));
                        if (runtime != null) Console.WriteLine("runtime output:\n" + runtime.LastOutput());
                        Console.WriteLine("{0} passed, 1 failed", passed);
                        return 1;
                    }
                    passed++;
                    Console.WriteLine("ok {0} ({1} ms)", step.Key, clock.ElapsedMilliseconds);
                }
            }
            finally
            {
                if (runtime != null) runtime.Dispose();
            }
            Console.WriteLine("{0} passed, 0 failed", passed);
            return 0;
        }

        static Dictionary<string, string> ParseArgs(string[] argv)
        {
            var args = new Dictionary<string, string>();
            for (int i = 0; i + 1 < argv.Length; i += 2)
            {
                if (!argv[i].StartsWith("--")) throw new ArgumentException("unexpected argument " + argv[i]);
                args[argv[i].Substring(2)] = argv[i + 1];
            }
            if (!args.ContainsKey("vectors")) throw new ArgumentException("usage: BindingsTest.exe --vectors DIR [--python PATH --model DIR --port N --dead-port N --prompt-tokens ... --expect-tokens ... --expect-logprobs ...]");
            return args;
        }

        public static Exception Unwrap(Exception e)
        {
            while (e is AggregateException && e.InnerException != null) e = e.InnerException;
            return e;
        }

        public static int[] Ints(string csv)
        {
            return Array.ConvertAll(csv.Split(','), s => int.Parse(s, CultureInfo.InvariantCulture));
        }

        public static double[] Doubles(string csv)
        {
            return Array.ConvertAll(csv.Split(','), s => double.Parse(s, CultureInfo.InvariantCulture));
        }
    }

    /// <summary>Assertions that say what differed.</summary>
    public static class Check
    {
        public static void That(bool condition, string what)
        {
            if (!condition) throw new Exception("check failed: " + what);
        }

        public static void Equal<T>(T expected, T actual, string what)
        {
            if (!EqualityComparer<T>.Default.Equals(expected, actual))
                throw new Exception(string.Format("{0}: expected {1}, got {2}", what, expected, actual));
        }

        public static void Close(double expected, double actual, double tolerance, string what)
        {
            if (Math.Abs(expected - actual) > tolerance)
                throw new Exception(string.Format("{0}: expected {1} ± {2}, got {3}", what, expected, tolerance, actual));
        }

        public static void Throws<E>(Action action, string what) where E : Exception
        {
            try
            {
                action();
            }
            catch (E)
            {
                return;
            }
            throw new Exception("expected " + typeof(E).Name + ": " + what);
        }

        /// <summary>The LlmError a task failed with; throws if it succeeded.</summary>
        public static LlmError Failure(Task task, string what)
        {
            That(task.IsFaulted, what + " should have failed (status " + task.Status + ")");
            var error = Program.Unwrap(task.Exception) as LlmException;
            That(error != null, what + " failed with " + Program.Unwrap(task.Exception).GetType().Name + ", not LlmException");
            return error.Error;
        }
    }

    /// <summary>A SynchronizationContext like Unity's or Godot's: callbacks run on the thread that pumps it.</summary>
    public sealed class PumpContext : SynchronizationContext
    {
        readonly Queue<KeyValuePair<SendOrPostCallback, object>> queue = new Queue<KeyValuePair<SendOrPostCallback, object>>();

        public override void Post(SendOrPostCallback d, object state)
        {
            lock (queue) queue.Enqueue(new KeyValuePair<SendOrPostCallback, object>(d, state));
        }

        public void Pump()
        {
            while (true)
            {
                KeyValuePair<SendOrPostCallback, object> item;
                lock (queue)
                {
                    if (queue.Count == 0) return;
                    item = queue.Dequeue();
                }
                item.Key(item.Value);
            }
        }
    }
}
